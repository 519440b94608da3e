from agegender.commands.cli import main

raise SystemExit(main())
