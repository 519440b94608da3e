from agegender.cli.main import main

raise SystemExit(main())
