"""Raven's built-in personas: one Markdown file per persona (YAML front matter, then the system
prompt), shipped as package data. ``bot.core.personas`` finds this folder with ``importlib.resources``;
there is no code here."""
