"""The API routers, one module per endpoint group; each reaches the app's state through `Depends`
(server/state.py's `State`) and leaves the OpenAI shapes to server/openai_format.py."""

from llmcli.server.routes import chat, completions, embeddings, health, page, tokenize

ROUTERS = [health.router, completions.router, chat.router, embeddings.router, tokenize.router, page.router]
