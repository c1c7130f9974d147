"""What a user runs, on top of the library: the ``swaa`` command (``cli``), the real-model demo
(``demo``), loading models from folders, GGUF files and the hub (``loading``), what the CLI and the demo
measure (``evaluate``), and their defaults (``defaults``)."""
