// Command publish publishes one app event to appevents over AMQP and waits for the broker's
// confirm.
//
// Usage:
//
//	go run . --name "Contact Created" --user user-123 \
//	  --payload '{"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"}' [--id evt_123]
//
// Environment:
//
//	AMQP_URL            broker URL (default amqp://guest:guest@127.0.0.1:5672/%2f)
//	APPEVENTS_EXCHANGE  exchange to publish to (default app_events)
//
// Prints the event id on success; exits non-zero with a message on stderr otherwise.
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

type event struct {
	ID         string          `json:"id"`
	Name       string          `json:"name"`
	UserID     string          `json:"user_id"`
	Payload    json.RawMessage `json:"payload"`
	OccurredAt string          `json:"occurred_at"`
}

func main() {
	name := flag.String("name", "", "event name, also the routing key (required)")
	user := flag.String("user", "", "id of the user in your app (required)")
	payload := flag.String("payload", "", "event payload, a JSON object (required)")
	id := flag.String("id", "", "event id (default: a new UUID)")
	flag.Parse()
	if *name == "" || *user == "" || *payload == "" || flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}

	eventID, err := publish(*name, *user, *payload, *id)
	if err != nil {
		fmt.Fprintln(os.Stderr, "publish failed:", err)
		os.Exit(1)
	}
	fmt.Println(eventID)
}

func publish(name, user, payload, id string) (string, error) {
	var object map[string]json.RawMessage
	if err := json.Unmarshal([]byte(payload), &object); err != nil || object == nil {
		return "", errors.New("--payload must be a JSON object")
	}
	// The id is the idempotency key: publishing the same id again never runs a workflow twice,
	// so a publish that was not confirmed can simply be retried with the same --id.
	if id == "" {
		id = newUUID()
	}
	body, err := json.Marshal(event{
		ID:         id,
		Name:       name,
		UserID:     user,
		Payload:    json.RawMessage(payload),
		OccurredAt: time.Now().UTC().Format(time.RFC3339),
	})
	if err != nil {
		return "", err
	}

	url := getenv("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
	exchange := getenv("APPEVENTS_EXCHANGE", "app_events")
	conn, err := amqp.Dial(url)
	if err != nil {
		return "", fmt.Errorf("cannot connect to the broker: %w", err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return "", err
	}
	// Idempotent: the same declaration the worker makes.
	if err := ch.ExchangeDeclare(exchange, "topic", true, false, false, false, nil); err != nil {
		return "", err
	}
	// Publisher confirms: the broker acks each message once it has stored it, or nacks it.
	if err := ch.Confirm(false); err != nil {
		return "", err
	}
	// mandatory: a message no queue would take comes back as a basic.return, delivered
	// before its ack, instead of being dropped silently.
	returns := ch.NotifyReturn(make(chan amqp.Return, 1))

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	confirm, err := ch.PublishWithDeferredConfirmWithContext(ctx, exchange, name, true, false, amqp.Publishing{
		ContentType:  "application/json",
		DeliveryMode: amqp.Persistent, // the broker writes the message to disk
		MessageId:    id,
		Body:         body,
	})
	if err != nil {
		return "", fmt.Errorf("event %s was not sent: %w; retrying with --id %s is safe", id, err, id)
	}
	acked := make(chan bool, 1)
	go func() { acked <- confirm.Wait() }() // false on a nack or a closed channel
	select {
	case ok := <-acked:
		if !ok {
			return "", fmt.Errorf("the broker did not confirm event %s (nack, or the channel closed); retrying with --id %s is safe", id, id)
		}
	case <-ctx.Done():
		return "", fmt.Errorf("no confirm for event %s within 30s; retrying with --id %s is safe", id, id)
	}
	select {
	case r := <-returns:
		return "", fmt.Errorf("event %s was returned (%d %s): no queue is bound to exchange %q for routing key %q (has the appevents worker declared its queue?)",
			id, r.ReplyCode, r.ReplyText, exchange, name)
	default:
	}
	return id, nil
}

func getenv(key, fallback string) string {
	if value := os.Getenv(key); value != "" {
		return value
	}
	return fallback
}

// newUUID returns a random (version 4) UUID.
func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
