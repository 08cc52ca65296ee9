"""Invitation mail: the message (``message``) and how it is sent (``transport``)."""
