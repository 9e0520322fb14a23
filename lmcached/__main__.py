from lmcached.cli import main

raise SystemExit(main())
