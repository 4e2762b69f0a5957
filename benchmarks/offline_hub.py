"""How long the default backbone takes to say that the Hugging Face hub is out of reach.

`create_backbone()` (DINOv2-L/14 from the hub) on a machine whose hub cache lacks the weights,
timed from the call to the one-line `VolscanError`, timm and torch already imported (the CLI
imports them before this point too). Repeated `--reps` times; median and max printed with the
message and the CPU. Run it where the hub is really unreachable (no network), or pass
`--endpoint http://127.0.0.1:9` to point the hub client at a closed local port.

    python benchmarks/offline_hub.py --reps 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--endpoint", help="hub address to use instead of the configured one")
    args = parser.parse_args()

    import huggingface_hub.constants as hf_constants
    import timm  # noqa: F401  (imported before the backbone is built in every command)

    from volumetric.backbones import create_backbone
    from volumetric.errors import VolscanError

    if args.endpoint:
        hf_constants.ENDPOINT = args.endpoint
    seconds, message = [], ""
    for _ in range(args.reps):
        start = time.perf_counter()
        try:
            create_backbone()
        except VolscanError as exc:
            message = str(exc)
        seconds.append(time.perf_counter() - start)
    print(f"cpu: {platform.processor() or platform.machine()}; reps {args.reps}: median {statistics.median(seconds):.3f} s, "
          f"max {max(seconds):.3f} s")
    print(message or "no error: the weights were cached or downloaded")


if __name__ == "__main__":
    main()
