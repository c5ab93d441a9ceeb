# SPDX-License-Identifier: MIT
"""A long job that meets bad records, and survives them: donecache from end to end.

    python examples/pipeline.py            # computes; 7 malformed records fail, and are recorded
    python -m donecache failures pipeline-output/cache    # which failed, and why (any time later)
    python examples/pipeline.py            # reuses every result; the 7 are reported, not retried
    python examples/pipeline.py --fixed    # the parser handles them now: only the 7 are computed

Stage 1 writes one JSON file per record into a stage directory that is marked
DONE only when every record is written. Stage 2 runs a memoized transform over
the records; it keeps going past the malformed ones, and each success is cached
the moment it is computed. Each failure goes to the store's ledger as it
happens, so even if the job is killed halfway, `python -m donecache failures`
lists what failed so far and why; no bisecting.

The fix (--fixed) changes what the transform does with malformed records but
keeps version=1: the 1,993 good results stay valid, and the rerun computes the 7
failures only. All output goes to ./pipeline-output, or to $PIPELINE_OUT. (An
environment variable rather than an option, because pool workers import this
file afresh and must find the same cache.)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import random
import sys
import time

try:
    import donecache
except ImportError:  # Run from a checkout without installing: use the module beside this folder.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import donecache

OUT = os.environ.get("PIPELINE_OUT", "pipeline-output")
FIXED = "--fixed" in sys.argv  # The fixed parser; pool workers see the same command line.
RECORDS = 2000
MALFORMED = {137: "amount", 402: "date", 777: "missing", 1024: "amount", 1313: "date", 1666: "missing", 1999: "amount"}


def make_record(i: int) -> dict[str, object]:
    """A generated sales record; a few are deliberately broken, as real data is."""
    rng = random.Random(i)
    record: dict[str, object] = {
        "id": i,
        "customer": f"customer-{rng.randrange(300):03d}",
        "amount": f"{rng.uniform(1, 500):.2f}",
        "date": (datetime.date(2026, 1, 1) + datetime.timedelta(days=rng.randrange(300))).isoformat(),
    }
    flaw = MALFORMED.get(i)
    if flaw == "amount":
        record["amount"] = str(record["amount"]).replace(".", ",")  # A decimal comma.
    elif flaw == "date":
        record["date"] = datetime.date.fromisoformat(str(record["date"])).strftime("%d/%m/%Y")
    elif flaw == "missing":
        del record["customer"]
    return record


@donecache.memoize(os.path.join(OUT, "cache"), version=1)
def transform(record_json: str) -> dict[str, object]:
    """The expensive step: parse and enrich one record (it sleeps 1 ms to stand for real work)."""
    record = json.loads(record_json)
    time.sleep(0.001)
    if FIXED:  # What the first run's failures taught: decimal commas, day-first dates, no customer.
        record["amount"] = str(record["amount"]).replace(",", ".")
        if "/" in str(record["date"]):
            record["date"] = datetime.datetime.strptime(str(record["date"]), "%d/%m/%Y").date().isoformat()
        record.setdefault("customer", "unknown")
    try:
        amount = float(str(record["amount"]))
    except ValueError:
        raise ValueError(f"amount {record['amount']!r} is not a number") from None
    day = datetime.date.fromisoformat(str(record["date"]))  # Raises ValueError on a bad date.
    return {
        "id": record["id"],
        "customer": record["customer"],  # KeyError when it is missing.
        "cents": round(amount * 100),
        "weekday": day.strftime("%A"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="processes for stage 2 (1: no pool)")
    parser.add_argument("--fixed", action="store_true", help="use the parser that handles the malformed records")
    args = parser.parse_args()
    started = time.monotonic()

    # Stage 1: one file per record. The DONE marker appears only when all are written;
    # if this run dies halfway, the next one resumes from the pieces already there.
    records_dir = os.path.join(OUT, "records")
    with donecache.done_dir(records_dir, version=1) as stage:
        if stage.done:
            print(f"stage 1: {records_dir} is done; skipped")
        else:
            before = sum(1 for _ in stage.path.glob("*.json"))
            for i in range(RECORDS):
                stage.piece(f"{i:04d}.json", lambda: json.dumps(make_record(i), sort_keys=True))
            print(f"stage 1: wrote {RECORDS - before} record files to {records_dir} ({before} were already there)")

    # Stage 2: the memoized transform over every record, keeping going past bad ones.
    # Without --fixed this passes retry_failures=False: the failures that the ledger
    # holds for the current code are reported from it instead of being called again
    # (with the default, True, they would be called again).
    inputs = [path.read_text() for path in sorted(stage.path.glob("*.json"))]
    # label= names each record in the ledger by its id, not by the start of its text.
    batch = transform.map(
        inputs,
        keep_going=True,
        workers=args.workers,
        retry_failures=args.fixed,
        label=lambda text: f"record {json.loads(text)['id']:04d}",
    )
    # The summary says what the cache saved: "1,993 reused (saved 2.1 s of compute)".
    print(f"stage 2: {batch.summary}")
    for failure in batch.failures:
        record_id = json.loads(failure.input)["id"]
        exc = failure.exception
        if isinstance(exc, donecache.FailureRecord):  # From the ledger: an earlier run's failure.
            print(f"  record {record_id:04d}: {exc.type.rpartition('.')[2]}: {exc.message} (recorded earlier)")
        else:
            print(f"  record {record_id:04d}: {type(exc).__name__}: {exc}")

    # The report: written atomically, so a crash never leaves a half-written CSV.
    rows = batch.successes
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", "customer", "cents", "weekday"])
    writer.writeheader()
    writer.writerows(rows)
    report = os.path.join(OUT, "report.csv")
    with donecache.atomic_write(report, newline="", encoding="utf-8") as f:
        f.write(buffer.getvalue())
    print(f"report: {report} ({len(rows)} rows) in {time.monotonic() - started:.1f} s")
    if batch.failures:
        print(f"The ledger keeps them: python -m donecache failures {os.path.join(OUT, 'cache')}")
        print("Fix the parser (here: run with --fixed) and run again: only they will be computed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
