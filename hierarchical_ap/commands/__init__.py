"""Sub-commands of `hap`; each module exposes `add_parser(subparsers)` and sets `run` on its args."""
