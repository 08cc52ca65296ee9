"""PATCH `add` on a multi-valued attribute: time to merge N new values into N existing ones.

    python bench/patch_add.py [--sizes 1000,10000,100000] [--repeat 3]

Runs the Patcher alone (no server, no database): this is the work done while
the user row is locked. Linear dedup means 10x the values costs about 10x the
time; the former list-membership dedup cost 100x. Prints one line per size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.scim.patch import Patcher  # noqa: E402
from api.scim.schema import USER_RESOURCE  # noqa: E402
from models.settings import ScimLimits  # noqa: E402

PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def one_run(size: int) -> float:
    existing = [{"value": f"old{i}@example.com", "type": "work"} for i in range(size)]
    # Half the new values repeat existing ones (in another key order), half are new.
    new = [{"type": "work", "value": f"old{i}@example.com"} for i in range(0, size, 2)]
    new += [{"value": f"new{i}@example.com", "type": "home"} for i in range(size // 2)]
    doc = {"userName": "bench@example.com", "emails": existing}
    body = {"schemas": [PATCH_OP], "Operations": [{"op": "add", "path": "emails", "value": new}]}
    started = time.perf_counter()
    # No cap here: the bench measures the merge itself, past SCIM_MAX_VALUES.
    result = Patcher(USER_RESOURCE, doc, limits=ScimLimits(max_values=10**9)).apply(body)
    elapsed = time.perf_counter() - started
    assert len(result["emails"]) == size + size // 2
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    previous = None
    print(f"{'values':>8} {'best ms':>9} {'per value µs':>13} {'x previous':>10}")
    for size in sizes:
        best = min(one_run(size) for _ in range(args.repeat))
        ratio = f"{best / previous:.1f}" if previous else "-"
        print(f"{size:>8} {best * 1000:>9.1f} {best / size * 1e6:>13.2f} {ratio:>10}")
        previous = best
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
