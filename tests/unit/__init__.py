# A package, so that tests/unit/test_queues.py and tests/test_queues.py can both exist (pytest's
# default import mode needs distinct module names).
