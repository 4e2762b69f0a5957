"""One module per `volscan` sub-command; each defines `add_parser(subparsers)` and `run(args)`.

A command imports its work inside `run` (the one place in `pipelines` where imports inside
functions are the rule): `volscan --help` and `volscan <command> --help` then load only the
parser, and a bad option is answered at once.
"""
