"""POST /Bulk (RFC 7644 §3.7): bulkId references, failOnErrors, limits."""

from __future__ import annotations

from api.scim.bulk import MAX_OPERATIONS

BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def test_bulk_creates_a_user_and_a_group_that_references_it_by_bulk_id(tenant):
    """RFC 7644 §3.7.2: a later operation may name an earlier POST's resource as bulkId:<id>."""
    response = tenant.client.post("/Bulk", json={"schemas": [BULK], "Operations": [
        {"method": "POST", "path": "/Users", "bulkId": "u1", "data": {"schemas": [USER], "userName": "bulk@x.com"}},
        {"method": "POST", "path": "/Groups", "bulkId": "g1",
         "data": {"schemas": [GROUP], "displayName": "Bulk", "members": [{"value": "bulkId:u1"}]}},
        {"method": "PATCH", "path": "/Users/bulkId:u1",
         "data": {"schemas": [PATCH], "Operations": [{"op": "replace", "path": "displayName", "value": "Bulky"}]}},
    ]})
    assert response.status_code == 200, response.text
    results = response.json()["Operations"]
    assert [r["status"] for r in results] == ["201", "201", "200"]
    user_id = results[0]["location"].rsplit("/", 1)[1]
    group = tenant.client.get(results[1]["location"].split(tenant.tenant_url)[1]).json()
    assert [m["value"] for m in group["members"]] == [user_id]
    assert tenant.client.get(f"/Users/{user_id}").json()["displayName"] == "Bulky"
    assert all(r["version"].startswith('W/"') for r in results)


def test_fail_on_errors_stops_after_that_many_errors(tenant):
    """RFC 7644 §3.7.3: failOnErrors=1 stops at the first failed operation; earlier ones stay done."""
    response = tenant.client.post("/Bulk", json={"schemas": [BULK], "failOnErrors": 1, "Operations": [
        {"method": "POST", "path": "/Users", "bulkId": "a", "data": {"schemas": [USER], "userName": "a@x.com"}},
        {"method": "POST", "path": "/Users", "bulkId": "b", "data": {"schemas": [USER], "userName": "A@X.com"}},
        {"method": "POST", "path": "/Users", "bulkId": "c", "data": {"schemas": [USER], "userName": "c@x.com"}},
    ]})
    results = response.json()["Operations"]
    assert [r["status"] for r in results] == ["201", "409"]
    assert results[1]["response"]["scimType"] == "uniqueness"
    listed = tenant.client.get("/Users").json()
    assert sorted(u["userName"] for u in listed["Resources"]) == ["a@x.com"]


def test_an_unknown_bulk_id_fails_that_operation_only(tenant):
    response = tenant.client.post("/Bulk", json={"schemas": [BULK], "Operations": [
        {"method": "DELETE", "path": "/Users/bulkId:nope"},
        {"method": "POST", "path": "/Users", "bulkId": "ok", "data": {"schemas": [USER], "userName": "ok@x.com"}},
    ]})
    assert [r["status"] for r in response.json()["Operations"]] == ["409", "201"]


def test_too_many_operations_is_413_and_nothing_runs(tenant):
    """The limit advertised in /ServiceProviderConfig is enforced (RFC 7644 §3.7.4)."""
    assert tenant.client.get("/ServiceProviderConfig").json()["bulk"]["maxOperations"] == MAX_OPERATIONS
    ops = [{"method": "POST", "path": "/Users", "bulkId": f"b{i}", "data": {"schemas": [USER], "userName": f"u{i}"}}
           for i in range(MAX_OPERATIONS + 1)]
    response = tenant.client.post("/Bulk", json={"schemas": [BULK], "Operations": ops})
    assert response.status_code == 413
    assert tenant.client.get("/Users").json()["totalResults"] == 0


def test_a_bulk_request_without_its_schema_is_400(tenant):
    response = tenant.client.post("/Bulk", json={"Operations": []})
    assert response.status_code == 400 and response.json()["scimType"] == "invalidSyntax"
