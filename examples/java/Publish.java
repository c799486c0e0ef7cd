// Publish one app event to appevents over AMQP and wait for the broker's confirm.
//
// Usage:
//   java Publish --name "Contact Created" --user user-123 \
//     --payload '{"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"}' [--id evt_123]
//
// Environment:
//   AMQP_URL            broker URL (default amqp://guest:guest@127.0.0.1:5672/%2f)
//   APPEVENTS_EXCHANGE  exchange to publish to (default app_events)
//
// Prints the event id on success; exits non-zero with a message on stderr otherwise.
// Needs only com.rabbitmq:amqp-client; a real application would build the body with its
// JSON library (Jackson, Gson) instead of by hand.

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.BuiltinExchangeType;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.Return;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.time.Instant;
import java.time.temporal.ChronoUnit;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicReference;

public class Publish {
    private static final String USAGE =
            "usage: java Publish --name NAME --user USER_ID --payload JSON [--id ID]";

    public static void main(String[] argv) {
        Map<String, String> args = new HashMap<>();
        for (int i = 0; i < argv.length; i += 2) {
            if (!List.of("--name", "--user", "--payload", "--id").contains(argv[i]) || i + 1 >= argv.length) {
                fail("unexpected argument " + argv[i] + "\n" + USAGE);
            }
            args.put(argv[i].substring(2), argv[i + 1]);
        }
        for (String required : List.of("name", "user", "payload")) {
            if (args.getOrDefault(required, "").isEmpty()) {
                fail("--" + required + " is required\n" + USAGE);
            }
        }
        String name = args.get("name");
        String payload = args.get("payload").strip();
        // Only a cheap check here: the worker dead-letters a body whose payload is not an object.
        if (!payload.startsWith("{") || !payload.endsWith("}")) {
            fail("--payload must be a JSON object");
        }

        // The id is the idempotency key: publishing the same id again never runs a workflow
        // twice, so a publish that was not confirmed can simply be retried with the same --id.
        String id = args.getOrDefault("id", UUID.randomUUID().toString());
        String body = "{\"id\":" + json(id)
                + ",\"name\":" + json(name)
                + ",\"user_id\":" + json(args.get("user"))
                + ",\"payload\":" + payload
                + ",\"occurred_at\":" + json(Instant.now().truncatedTo(ChronoUnit.SECONDS).toString())
                + "}";
        String exchange = env("APPEVENTS_EXCHANGE", "app_events");

        ConnectionFactory factory = new ConnectionFactory();
        try {
            factory.setUri(env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"));
        } catch (Exception e) {
            fail("AMQP_URL is not a valid amqp:// URL: " + e.getMessage());
        }
        // A one-shot publisher should fail, not reconnect behind our back.
        factory.setAutomaticRecoveryEnabled(false);

        Connection connection = null;
        try {
            connection = factory.newConnection("appevents example publisher");
        } catch (IOException | TimeoutException e) {
            fail("cannot connect to the broker: " + e);
        }
        try {
            Channel channel = connection.createChannel();
            // Idempotent: the same declaration the worker makes.
            channel.exchangeDeclare(exchange, BuiltinExchangeType.TOPIC, true);
            // Publisher confirms: the broker acks each message once it has stored it, or nacks it.
            channel.confirmSelect();
            // mandatory: a message no queue would take comes back as a basic.return, handled
            // before its ack, instead of being dropped silently.
            AtomicReference<Return> returned = new AtomicReference<>();
            channel.addReturnListener(returned::set);

            AMQP.BasicProperties properties = new AMQP.BasicProperties.Builder()
                    .contentType("application/json")
                    .deliveryMode(2) // persistent: the broker writes the message to disk
                    .messageId(id)
                    .build();
            channel.basicPublish(exchange, name, true, properties, body.getBytes(StandardCharsets.UTF_8));
            // Throws IOException on a nack, TimeoutException if no confirm comes in time.
            channel.waitForConfirmsOrDie(30_000);

            Return r = returned.get();
            if (r != null) {
                fail("event " + id + " was returned (" + r.getReplyCode() + " " + r.getReplyText()
                        + "): no queue is bound to exchange \"" + exchange + "\" for routing key \"" + name
                        + "\" (has the appevents worker declared its queue?)");
            }
            System.out.println(id);
        } catch (Exception e) {
            fail("event " + id + " was not confirmed: " + describe(e) + "; retrying with --id " + id + " is safe");
        } finally {
            try {
                connection.close();
            } catch (Exception ignored) {
                // already closed
            }
        }
    }

    private static String env(String key, String fallback) {
        String value = System.getenv(key);
        return value == null || value.isEmpty() ? fallback : value;
    }

    /** The root cause, which carries the broker's reason. */
    private static String describe(Throwable e) {
        while (e.getCause() != null) {
            e = e.getCause();
        }
        return e.toString();
    }

    /** A JSON string literal. */
    private static String json(String text) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : text.toCharArray()) {
            switch (c) {
                case '"': out.append("\\\""); break;
                case '\\': out.append("\\\\"); break;
                default:
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
            }
        }
        return out.append('"').toString();
    }

    private static void fail(String message) {
        System.err.println("publish failed: " + message);
        System.exit(1);
    }
}
