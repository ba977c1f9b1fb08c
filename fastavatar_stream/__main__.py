"""`python -m fastavatar_stream`: the command-line interface (fastavatar_stream.cli)."""
from fastavatar_stream.cli import main

raise SystemExit(main())
