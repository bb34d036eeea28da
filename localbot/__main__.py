from localbot.cli import main

raise SystemExit(main())
