import requests
import json

response = requests.post(
    "http://localhost:8002/chat/stream",
    json={"message": "Tell me a short story"},
    stream=True
)

for line in response.iter_lines():
    if line:
        line = line.decode('utf-8')
        if line.startswith('data: '):
            data = json.loads(line[6:])
            if 'token' in data:
                print(data['token'], end='', flush=True)
            elif 'done' in data:
                print("\n[Stream complete]")
                break
