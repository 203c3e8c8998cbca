import requests

response = requests.post(
    "http://localhost:8002/chat",
    json={
        "message": "What is Python?",
        "temperature": 0.7
    }
)

data = response.json()
print(f"Response: {data['response']}")
print(f"Session ID: {data['session_id']}")
