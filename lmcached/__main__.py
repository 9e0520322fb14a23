from lmcached.cli.main import main

raise SystemExit(main())
