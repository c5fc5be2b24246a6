from llmtap.cli import main

raise SystemExit(main())
