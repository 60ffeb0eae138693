"""torchrun, as `python -m torch.distributed.run` runs it, but one line instead of a traceback when a rank fails.

    python -m fcmae.runtime.launch.torchrun [torchrun's arguments]

fcmae.runtime.launch.launcher starts several processes on a node with this. When
a training process fails, it has printed its own message (a failure that
one rank meets stops every rank with the same message: see
fcmae.runtime.stepping.StopAgreement), so torchrun's ChildFailedError
traceback would only bury it: this prints which rank failed first and exits
with that rank's exit code (2: bad input, 3: a non-finite loss) instead of 1.
A rank that exited with a code of its own counts before one that died of a
signal (torchrun's SIGTERM to the others, or an abort while exiting).
"""

import sys
from typing import Optional, Sequence

import torch.distributed.run as torch_run
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        torch_run.run(torch_run.parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as e:
        failures = e.failures
        own = {r: f for r, f in failures.items() if f.exitcode > 0}
        rank = min(own or failures, key=lambda r: failures[r].timestamp)
        failure = failures[rank]
        print(f"launch: rank {rank} exited with code {failure.exitcode}; the other ranks were stopped",
              file=sys.stderr, flush=True)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)


if __name__ == "__main__":
    main()
