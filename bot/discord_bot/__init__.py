"""The Discord front end (needs the discord extra)."""
