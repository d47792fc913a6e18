from fedsecmem.cli import main

raise SystemExit(main())
