"""What the two services share on purpose, and nothing else: the OpenAI error shape
(``common.errors``), settings helpers (``common.settings``) and the server runner
(``common.serving``). It imports neither ``bridge`` nor ``auth_proxy`` (``tests/test_layout.py``)."""
