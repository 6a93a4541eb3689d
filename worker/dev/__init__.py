"""Development and demonstration only: ``bagel-jobs up`` (the embedded stack as child processes),
``bagel-jobs demo`` (a try-on batch through the SDK) and the local webhook receiver they and the
tests use. Production code never imports this package (``tests/test_layout.py`` checks it); the
CLI reaches it only inside the ``up`` and ``demo`` commands.
"""
