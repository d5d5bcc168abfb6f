import sys

from ldm.sampling_job.cli import main

sys.exit(main())
