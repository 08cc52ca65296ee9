def test_health(live_server, admin, tenant):
    import httpx
    assert httpx.get(live_server.url + "/healthz").status_code == 200
    r = tenant.client.get("/Users", params={"filter": 'userName eq "nobody"'})
    assert r.status_code == 200 and r.json()["totalResults"] == 0
