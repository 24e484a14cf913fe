"""The Discord front end: a discord.py bot with one cog per area. It parses options, calls one
service method and formats what comes back; the core decides."""
