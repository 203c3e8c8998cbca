import requests

class LLMChatClient:
    def __init__(self, base_url="http://localhost:8002"):
        self.base_url = base_url
        self.session_id = None
    
    def chat(self, message, temperature=0.7):
        """Send a message and get response"""
        payload = {
            "message": message,
            "temperature": temperature
        }
        if self.session_id:
            payload["session_id"] = self.session_id
        
        response = requests.post(
            f"{self.base_url}/chat",
            json=payload
        )
        response.raise_for_status()
        data = response.json()
        self.session_id = data["session_id"]
        return data["response"]
    
    def clear(self):
        """Clear conversation history"""
        if self.session_id:
            requests.post(
                f"{self.base_url}/chat/clear",
                json={"session_id": self.session_id}
            )
            self.session_id = None

# Usage
client = LLMChatClient()
print(client.chat("Hello!"))
print(client.chat("What did I just say?"))
client.clear()
