from fedstudy.cli import main

raise SystemExit(main())
