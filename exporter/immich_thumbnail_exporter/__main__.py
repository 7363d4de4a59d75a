from immich_thumbnail_exporter.cli.main import main

raise SystemExit(main())
