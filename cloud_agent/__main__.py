"""``python -m cloud_agent`` == ``cloud-agent``."""

from cloud_agent.cli import main

raise SystemExit(main())
