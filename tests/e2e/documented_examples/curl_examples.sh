curl -X POST "http://localhost:8002/chat" \
  -H "Content-Type: application/json" \
  -d '{
    "message": "What is Python?",
    "temperature": 0.7
  }'
echo
curl -X POST "http://localhost:8002/chat/clear" \
  -H "Content-Type: application/json" \
  -d '{"session_id": "your-session-id"}'
echo
curl -X POST "http://localhost:8002/chat" \
  -H "Content-Type: application/json" \
  -d '{"message": "Explain quantum computing"}'
echo
curl -X POST "http://localhost:8002/chat" \
  -H "Content-Type: application/json" \
  -d '{
    "message": "Write a haiku about AI",
    "temperature": 0.9,
    "max_tokens": 100
  }'
echo
