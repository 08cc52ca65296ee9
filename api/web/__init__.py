"""The admin web page: server-rendered HTML over the same service functions as the admin API."""
