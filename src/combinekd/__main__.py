from combinekd.cli import main

raise SystemExit(main())
