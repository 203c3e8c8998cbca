"""Start the whole service from a checkout: ``python api_service.py [model_path]``.

The same as the installed command ``llamachat-serve``; the code is in
``rest_gateway/launcher.py``, where pip installs it too.
"""

import sys

from rest_gateway.launcher import main

if __name__ == "__main__":
    sys.exit(main())
