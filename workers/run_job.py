"""Entry point of one job process: `python -m workers.run_job JOB_ID --attempt N --claimed-by OWNER`."""

from __future__ import annotations

import argparse
import sys

from workers.quiet import quiet_third_party

quiet_third_party()  # before the runner imports torch and its neighbours (tqdm reads its settings on import)

from workers.runner import run_job  # noqa: E402
from workers.settings import Settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("job_id")
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--claimed-by", default=None)
    args = parser.parse_args(argv)
    status = run_job(args.job_id, Settings(), attempt=args.attempt, claimed_by=args.claimed_by)
    print(f"[crucible] job {args.job_id} attempt {args.attempt}: {status}", flush=True)
    return 0 if status in ("succeeded", "cancelled", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
