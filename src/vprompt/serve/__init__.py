"""HTTP server: the JSON API of ``docs/serve-api.md`` plus the interactive web page.

Needs the ``serve`` extra (``pip install 'vprompt[serve]'``)::

    from vprompt.serve import ServeSettings, create_app

    app = create_app(ServeSettings(model="sam:tiny", weights="none"))
"""

from vprompt.serve.app import create_app
from vprompt.serve.service import Service
from vprompt.serve.settings import ServeSettings, parse_pack_specs

__all__ = ["ServeSettings", "Service", "create_app", "parse_pack_specs"]
