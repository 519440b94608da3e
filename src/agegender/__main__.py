from agegender.cli import main

raise SystemExit(main())
