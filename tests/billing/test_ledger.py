"""The ledger as finance reads it: CSV cells and amounts (issue 9 "Ledger with money")."""

from __future__ import annotations

from billing.ledger import csv_lines, format_amount
from models.tables import Purchase, Tenant


def test_amounts_are_written_in_the_currencys_unit():
    """Stripe's minor units become decimals (usd cents), except for zero-decimal currencies (jpy)."""
    assert format_amount(123456, "usd") == "1234.56"
    assert format_amount(5, "eur") == "0.05"
    assert format_amount(500, "jpy") == "500"
    assert format_amount(None, "usd") == ""


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted():
    """A tenant name or trigger starting with = + - @ is written with a leading ' (CSV injection)."""
    tenant = Tenant(id="t1", name='=HYPERLINK("http://x")')
    purchase = Purchase(id="p1", tenant_id="t1", status="not_billed", trigger="+cmd", demand={})

    header, line = list(csv_lines(tenant, [purchase]))

    assert header.startswith("purchase_id,tenant_id,tenant_name")
    assert "'=HYPERLINK" in line and "'+cmd" in line
