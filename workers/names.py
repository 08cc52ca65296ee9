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

# The queue of each actor: the actors declare themselves with it, and a message
# sent by name (the waker, the sweep) goes to the same queue.
QUEUE_OF = {
    RECONCILE_TENANT: RECONCILE_QUEUE,
    PURCHASE_SEATS: PURCHASE_QUEUE,
    SYNC_SEATS: PURCHASE_QUEUE,
    SEND_INVITATION: INVITE_QUEUE,
}
