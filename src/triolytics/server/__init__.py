"""The server's edges: the task tree (app), HTTP/1.1 and WebSocket connections on one
port, the API routes and the session reaper. Only here do sockets and trio tasks meet
the core."""
