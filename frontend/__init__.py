"""The clients: the web page in static/ and the terminal client in cli.py."""
