"""MCP stdio server exposing Fun-ASR-Nano (MLX) speech-to-text to Claude Desktop, agents and scripts.

Importing this package is cheap and silent: the model, MLX and the MCP SDK load only when the
server is built (`server.app.create_server`) or run (`funasr-nano-mcp`, i.e. `server.__main__:main`).
"""

__version__ = "0.1.0"
