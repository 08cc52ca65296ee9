"""The directory mirror: the IdP's Users, Groups and memberships per tenant, and the sync events.

The SCIM endpoints, the admin API and the workers read and write the mirror
through these modules only; they return rows and raise `errors.DirectoryError`,
and the SCIM protocol (parsing, filtering, rendering) stays in `api/scim`.
"""
