import requests

session_id = None

# First message
response = requests.post(
    "http://localhost:8002/chat",
    json={"message": "My name is Alice"}
)
session_id = response.json()["session_id"]

# Follow-up message (maintains context)
response = requests.post(
    "http://localhost:8002/chat",
    json={
        "message": "What's my name?",
        "session_id": session_id
    }
)
print(response.json()["response"])  # Should remember Alice
