from facecls.cli import main

raise SystemExit(main())
