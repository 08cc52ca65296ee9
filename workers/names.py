"""Queue and actor names: they are on the wire (Redis keys, message bodies), so they are defined once here."""

from __future__ import annotations

RECONCILE_QUEUE = "reconcile"
PURCHASE_QUEUE = "purchases"
INVITE_QUEUE = "invitations"
QUEUES = (RECONCILE_QUEUE, PURCHASE_QUEUE, INVITE_QUEUE)

RECONCILE_TENANT = "reconcile_tenant"
PURCHASE_SEATS = "purchase_seats"
SYNC_SEATS = "sync_seats"
SEND_INVITATION = "send_invitation"
# Dramatiq's on_retry_exhausted callback of send_invitation.
GIVE_UP_INVITATIONS = "give_up_invitations"

# The queue of each actor: the actors declare themselves with it, and a message
# sent by name (the waker, the sweep) goes to the same queue.
QUEUE_OF = {
    RECONCILE_TENANT: RECONCILE_QUEUE,
    PURCHASE_SEATS: PURCHASE_QUEUE,
    SYNC_SEATS: PURCHASE_QUEUE,
    SEND_INVITATION: INVITE_QUEUE,
    GIVE_UP_INVITATIONS: INVITE_QUEUE,
}

# Options of a send_invitation message (Dramatiq keeps a message's options across its retries):
# after a failed attempt, the ids the message still owns and why the last attempt failed.
OWNED_IDS = "sally_invitation_ids"
LAST_ERROR = "sally_last_error"
# Set by `sally-scim jobs retry` on the message it re-queues: an operator asked for
# the job again, so what its give-up closed is opened again (send_invitation).
OPERATOR_RETRY = "sally_operator_retry"
