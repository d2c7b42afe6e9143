#!/usr/bin/env python3
"""Deletes the queues that test fleets left behind when a run was killed before its cleanup.

A test fleet names its queues `t<ULID>.…` (tests/src/fleet.rs); the ULID's first ten characters are
its creation time. Queues of fleets created more than `--older-than-h` hours ago (default 2) are
deleted with `rabbitmqctl`: no test runs that long, so a concurrent run's queues are never touched.
Without `rabbitmqctl` (a broker elsewhere) it says so and does nothing.

Usage: python3 scripts/stale-test-queues.py [--older-than-h H]
"""
import argparse
import re
import shutil
import subprocess
import sys
import time

CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
TEST_QUEUE = re.compile(r"^t([0-9a-hjkmnp-tv-z]{26})\.")


def ulid_ms(ulid: str) -> int:
    ms = 0
    for c in ulid[:10]:
        ms = ms * 32 + CROCKFORD.index(c)
    return ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--older-than-h", type=float, default=2.0)
    args = parser.parse_args()
    if shutil.which("rabbitmqctl") is None:
        print("stale test queues: no rabbitmqctl here; nothing deleted")
        return 0
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
        capture_output=True, text=True, timeout=120,
    )
    if listed.returncode != 0:
        print(f"stale test queues: rabbitmqctl list_queues failed: {listed.stderr.strip()}")
        return 0
    cutoff = time.time() * 1000 - args.older_than_h * 3_600_000
    stale = []
    for name in listed.stdout.split():
        m = TEST_QUEUE.match(name)
        if m and ulid_ms(m.group(1)) < cutoff:
            stale.append(name)
    for name in stale:
        subprocess.run(["rabbitmqctl", "delete_queue", "-q", name], capture_output=True, timeout=60)
    print(f"stale test queues: deleted {len(stale)} left by test runs older than {args.older_than_h} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
