from hydra_otel.cli import main

raise SystemExit(main())
