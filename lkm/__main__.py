from lkm.cli import main

raise SystemExit(main())
