"""One module per `volscan` sub-command; each defines `add_parser(subparsers)` and `run(args)`."""
