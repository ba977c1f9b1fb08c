from fastavatar_stream.cli import main

raise SystemExit(main())
