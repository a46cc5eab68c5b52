package io.neurostream.bench;

import com.fasterxml.jackson.core.JsonFactory;
import com.fasterxml.jackson.core.JsonGenerator;
import com.fasterxml.jackson.core.JsonParser;
import com.fasterxml.jackson.core.JsonToken;
import java.io.IOException;
import java.io.StringWriter;
import java.io.UncheckedIOException;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.time.OffsetDateTime;
import java.time.format.DateTimeParseException;
import java.util.Comparator;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;
import java.util.stream.Stream;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.Serializer;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.CloseOptions;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.TopologyConfig;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.KGroupedStream;
import org.apache.kafka.streams.kstream.KStream;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Named;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.kstream.Suppressed;
import org.apache.kafka.streams.kstream.TimeWindows;
import org.apache.kafka.streams.kstream.Windowed;
import org.apache.kafka.streams.processor.TimestampExtractor;
import org.apache.kafka.streams.state.WindowStore;

/**
 * The Kafka Streams peer of neurostream's end-to-end benchmark: the same window job as
 * neurostream's (1 s tumbling event-time windows per JSON {@code key}, count/sum/mean/min/max of
 * {@code value}, one final result per closed window), as a Kafka Streams application.
 *
 * <pre>
 * java -Xmx512m -jar kstreams-peer.jar --brokers HOST:PORT --input TOPIC --output TOPIC \
 *     --app-id ID [--grace-ms 0] [--threads 2] [--expected N] [--no-repartition]
 * </pre>
 *
 * <p>Stdout carries only JSON event lines: {@code {"event":"running","t_ms":..}} when the
 * application first reaches RUNNING; with {@code --expected N}, {@code
 * {"event":"consumed","n":N,"first_ms":..,"last_ms":..}} when the N-th input record has been
 * processed; and {@code {"event":"stopped","t_ms":..,"dropped_records":..,"key_mismatches":..}}
 * after a clean close on SIGTERM (exit 0). Logs (WARN and above) go to stderr. Exit 2: bad
 * arguments, or the input or output topic does not exist; exit 1: a stream thread failed.
 *
 * <p>Stream time, and so which records are late and when a window closes, is per task. By
 * default the job regroups by the JSON key through a repartition topic ({@code
 * <app-id>-json-key-repartition}), whose partitions interleave the records of all input
 * partitions: with several input partitions read at different paces, stream time runs ahead of
 * the slower ones and many of their records are dropped as late, where neurostream (one stream
 * time per input partition) keeps them. {@code --no-repartition} groups by the Kafka key instead,
 * which {@code neurostream produce} sets to the JSON key: no repartition topic, one stream time
 * per input partition, the same closed windows as neurostream's.
 */
public final class WindowJob {
    /** Window size, as in neurostream's benchmark configuration. */
    static final Duration WINDOW = Duration.ofSeconds(1);

    /** neurostream's bounds on numbers (src/event.rs): larger magnitudes are rejected. */
    static final double MAX_ABS_NUMBER = 1e100;

    static final int MAX_FEATURES = 1024;

    /** Marks an absent {@code ts}. */
    static final long NO_TS = Long.MIN_VALUE;

    private WindowJob() {}

    // ---------------------------------------------------------------------------------------
    // Command line

    static final class Args {
        String brokers;
        String input;
        String output;
        String appId;
        long graceMs = 0;
        int threads = 2;
        long expected = 0;
        boolean noRepartition = false;

        static Args parse(String[] argv) {
            Args a = new Args();
            for (int i = 0; i < argv.length; i++) {
                String name = argv[i];
                String value;
                int eq = name.indexOf('=');
                if (name.startsWith("--") && eq > 0) {
                    value = name.substring(eq + 1);
                    name = name.substring(0, eq);
                } else if (name.equals("--no-repartition")) {
                    a.noRepartition = true;
                    continue;
                } else if (name.equals("--help") || name.equals("-h")) {
                    usage(null);
                    System.exit(0);
                    return null;
                } else if (i + 1 < argv.length) {
                    value = argv[++i];
                } else {
                    usage("missing a value after " + name);
                    return null;
                }
                try {
                    switch (name) {
                        case "--brokers" -> a.brokers = value;
                        case "--input" -> a.input = value;
                        case "--output" -> a.output = value;
                        case "--app-id" -> a.appId = value;
                        case "--grace-ms" -> a.graceMs = Long.parseLong(value);
                        case "--threads" -> a.threads = Integer.parseInt(value);
                        case "--expected" -> a.expected = Long.parseLong(value);
                        default -> {
                            usage("unknown option " + name);
                            return null;
                        }
                    }
                } catch (NumberFormatException e) {
                    usage(name + " needs a number, got `" + value + "`");
                    return null;
                }
            }
            if (a.brokers == null || a.input == null || a.output == null || a.appId == null) {
                usage("--brokers, --input, --output and --app-id are required");
                return null;
            }
            if (a.graceMs < 0 || a.threads < 1 || a.expected < 0) {
                usage("--grace-ms and --expected must be >= 0, --threads >= 1");
                return null;
            }
            return a;
        }

        static void usage(String error) {
            if (error != null) {
                System.err.println("kstreams-peer: " + error);
            }
            System.err.println(
                    "usage: java -jar kstreams-peer.jar --brokers HOST:PORT --input TOPIC"
                            + " --output TOPIC --app-id ID [--grace-ms 0] [--threads 2]"
                            + " [--expected N] [--no-repartition]");
        }
    }

    // ---------------------------------------------------------------------------------------
    // Input: the fields of an event that the window job needs

    /** One decoded input event: its grouping key, event time and value. */
    static final class Event {
        /** The JSON {@code key} (a string, or a number's text); null: absent. */
        final String key;
        /** The JSON {@code ts} in epoch ms; {@link #NO_TS}: absent. */
        final long ts;
        /** The JSON {@code value}; NaN: absent (a present value is always finite). */
        final double value;

        Event(String key, long ts, double value) {
            this.key = key;
            this.ts = ts;
            this.value = value;
        }
    }

    /**
     * Decodes an event with Jackson's streaming parser, accepting what neurostream's decoder
     * (src/event.rs) accepts: a JSON object whose {@code key} is a string or number, {@code ts}
     * epoch ms (integer or float) or an RFC 3339 string, {@code features} a non-empty array of at
     * most 1024 numbers, and {@code value} a finite number, each optional (null counts as
     * absent). Anything else is malformed and decodes to null, which the job drops (neurostream
     * sends those to its dead-letter topic). Never throws, so no deserialization handler is
     * involved.
     */
    static final class EventDeserializer implements Deserializer<Event> {
        private final JsonFactory json = new JsonFactory();

        @Override
        public Event deserialize(String topic, byte[] data) {
            if (data == null || data.length == 0) {
                return null;
            }
            try (JsonParser p = json.createParser(data)) {
                return decode(p);
            } catch (IOException | RuntimeException e) {
                return null;
            }
        }

        private static Event decode(JsonParser p) throws IOException {
            if (p.nextToken() != JsonToken.START_OBJECT) {
                return null;
            }
            String key = null;
            long ts = NO_TS;
            double value = Double.NaN;
            JsonToken t;
            while ((t = p.nextToken()) == JsonToken.FIELD_NAME) {
                String field = p.currentName();
                JsonToken v = p.nextToken();
                if (v == JsonToken.VALUE_NULL) {
                    continue;
                }
                switch (field) {
                    case "key" -> {
                        if (v == JsonToken.VALUE_STRING
                                || v == JsonToken.VALUE_NUMBER_INT
                                || v == JsonToken.VALUE_NUMBER_FLOAT) {
                            key = p.getText();
                        } else {
                            return null;
                        }
                    }
                    case "ts" -> {
                        ts = timestamp(p, v);
                        if (ts == NO_TS) {
                            return null;
                        }
                    }
                    case "value" -> {
                        if (v != JsonToken.VALUE_NUMBER_INT && v != JsonToken.VALUE_NUMBER_FLOAT) {
                            return null;
                        }
                        value = p.getDoubleValue();
                        if (!inRange(value)) {
                            return null;
                        }
                    }
                    case "features" -> {
                        if (!features(p, v)) {
                            return null;
                        }
                    }
                    default -> p.skipChildren();
                }
            }
            if (t != JsonToken.END_OBJECT || p.nextToken() != null) {
                return null;
            }
            return new Event(key, ts, value);
        }

        private static long timestamp(JsonParser p, JsonToken v) throws IOException {
            switch (v) {
                case VALUE_NUMBER_INT:
                    return p.getLongValue();
                case VALUE_NUMBER_FLOAT: {
                    double ms = p.getDoubleValue();
                    return Double.isFinite(ms) && Math.abs(ms) < 9.0e15 ? (long) Math.floor(ms) : NO_TS;
                }
                case VALUE_STRING:
                    try {
                        return OffsetDateTime.parse(p.getText()).toInstant().toEpochMilli();
                    } catch (DateTimeParseException | ArithmeticException e) {
                        return NO_TS;
                    }
                default:
                    return NO_TS;
            }
        }

        private static boolean features(JsonParser p, JsonToken v) throws IOException {
            if (v != JsonToken.START_ARRAY) {
                return false;
            }
            int n = 0;
            JsonToken x;
            while ((x = p.nextToken()) != JsonToken.END_ARRAY) {
                if (x != JsonToken.VALUE_NUMBER_INT && x != JsonToken.VALUE_NUMBER_FLOAT) {
                    return false;
                }
                if (++n > MAX_FEATURES || !inRange(p.getDoubleValue())) {
                    return false;
                }
            }
            return n > 0;
        }

        private static boolean inRange(double x) {
            return Double.isFinite(x) && Math.abs(x) <= MAX_ABS_NUMBER;
        }
    }

    /** Event time: the JSON {@code ts}, else the Kafka record's timestamp. */
    static final class EventTime implements TimestampExtractor {
        @Override
        public long extract(ConsumerRecord<Object, Object> record, long partitionTime) {
            if (record.value() instanceof Event e && e.ts != NO_TS) {
                return e.ts;
            }
            return record.timestamp();
        }
    }

    // ---------------------------------------------------------------------------------------
    // The aggregate and its serde

    /** count, sum, min, max of one (window, key); {@code values} counts events with a value. */
    static final class Agg {
        final long count;
        final long values;
        final double sum;
        final double min;
        final double max;

        static final Agg EMPTY = new Agg(0, 0, 0.0, Double.NaN, Double.NaN);

        /** Fixed layout: count, values (longs), sum, min, max (doubles), big-endian. */
        static final int BYTES = 5 * Long.BYTES;

        Agg(long count, long values, double sum, double min, double max) {
            this.count = count;
            this.values = values;
            this.sum = sum;
            this.min = min;
            this.max = max;
        }

        /** This aggregate plus one event whose value is {@code x} (NaN: none). */
        Agg add(double x) {
            if (Double.isNaN(x)) {
                return new Agg(count + 1, values, sum, min, max);
            }
            if (values == 0) {
                return new Agg(count + 1, 1, sum + x, x, x);
            }
            return new Agg(count + 1, values + 1, sum + x, Math.min(min, x), Math.max(max, x));
        }

        byte[] toBytes() {
            return ByteBuffer.allocate(BYTES)
                    .putLong(count)
                    .putLong(values)
                    .putDouble(sum)
                    .putDouble(min)
                    .putDouble(max)
                    .array();
        }

        static Agg fromBytes(byte[] b) {
            if (b == null) {
                return null;
            }
            if (b.length != BYTES) {
                throw new IllegalArgumentException("an aggregate is " + BYTES + " bytes, got " + b.length);
            }
            ByteBuffer buf = ByteBuffer.wrap(b);
            return new Agg(buf.getLong(), buf.getLong(), buf.getDouble(), buf.getDouble(), buf.getDouble());
        }
    }

    /** Events are only read (the input topic), never written. */
    static Serde<Event> eventSerde() {
        Serializer<Event> ser = (topic, e) -> {
            throw new UnsupportedOperationException("events are not written back");
        };
        return Serdes.serdeFrom(ser, new EventDeserializer());
    }

    static Serde<Agg> aggSerde() {
        Serializer<Agg> ser = (topic, agg) -> agg == null ? null : agg.toBytes();
        Deserializer<Agg> de = (topic, bytes) -> Agg.fromBytes(bytes);
        return Serdes.serdeFrom(ser, de);
    }

    // ---------------------------------------------------------------------------------------
    // Output

    private static final JsonFactory OUT_JSON = new JsonFactory();

    /**
     * One closed window as neurostream writes it (src/output.rs), less the fields this job does
     * not vary: {@code window_start} inclusive, {@code window_end} exclusive (epoch ms), and
     * mean/min/max null when no event of the window carried a value.
     */
    static String windowJson(Windowed<String> w, Agg agg) {
        StringWriter out = new StringWriter(160);
        try (JsonGenerator g = OUT_JSON.createGenerator(out)) {
            g.writeStartObject();
            g.writeNumberField("window_start", w.window().start());
            g.writeNumberField("window_end", w.window().end());
            g.writeStringField("key", w.key());
            g.writeNumberField("count", agg.count);
            g.writeNumberField("sum", agg.sum);
            if (agg.values > 0) {
                g.writeNumberField("mean", agg.sum / agg.values);
                g.writeNumberField("min", agg.min);
                g.writeNumberField("max", agg.max);
            } else {
                g.writeNullField("mean");
                g.writeNullField("min");
                g.writeNullField("max");
            }
            g.writeEndObject();
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
        return out.toString();
    }

    /** The output message key, neurostream's grouping identity: {@code key:tumbling:1000:start}. */
    static String windowKey(Windowed<String> w) {
        return w.key() + ":tumbling:" + WINDOW.toMillis() + ":" + w.window().start();
    }

    /** One JSON event line on stdout (the orchestrator reads these). */
    static void emit(String line) {
        synchronized (System.out) {
            System.out.println(line);
            System.out.flush();
        }
    }

    // ---------------------------------------------------------------------------------------
    // The job

    /** Records dropped by --no-repartition because their JSON key is not their Kafka key. */
    static final AtomicLong keyMismatches = new AtomicLong();

    static Topology topology(Args a, Properties props, AtomicLong seen, AtomicLong firstMs) {
        // The builder gets the application's configuration too, or it validates a default one
        // of its own (and logs that configuration's WARNs).
        StreamsBuilder builder = new StreamsBuilder(new TopologyConfig(new StreamsConfig(props)));
        KStream<String, Event> input = builder.stream(
                a.input,
                Consumed.with(Serdes.String(), eventSerde())
                        .withTimestampExtractor(new EventTime())
                        .withName("input"));
        if (a.expected > 0) {
            long expected = a.expected;
            input = input.peek((k, v) -> {
                if (firstMs.get() == 0) {
                    firstMs.compareAndSet(0, System.currentTimeMillis());
                }
                if (seen.incrementAndGet() == expected) {
                    emit("{\"event\":\"consumed\",\"n\":" + expected + ",\"first_ms\":" + firstMs.get()
                            + ",\"last_ms\":" + System.currentTimeMillis() + "}");
                }
            }, Named.as("count-input"));
        }
        KStream<String, Event> valid = input.filter((k, v) -> v != null, Named.as("drop-malformed"));
        KGroupedStream<String, Double> grouped;
        if (!a.noRepartition) {
            // Group by the JSON key (neurostream falls back to the Kafka key, then to ""),
            // carrying only the value (NaN: none) through the repartition topic.
            grouped = valid
                    .map((k, v) -> KeyValue.pair(v.key != null ? v.key : k != null ? k : "", v.value),
                            Named.as("by-json-key"))
                    .groupByKey(Grouped.with("json-key", Serdes.String(), Serdes.Double()));
        } else {
            // The Kafka key is the grouping key, which `neurostream produce` sets to the JSON
            // key: no repartition topic, so each window sees one input partition's stream time,
            // as in neurostream. A record whose JSON key is not its Kafka key is dropped (and
            // counted), not mis-grouped.
            grouped = valid
                    .filter((k, v) -> {
                        if (k != null && (v.key == null || v.key.equals(k))) {
                            return true;
                        }
                        if (keyMismatches.incrementAndGet() == 1) {
                            System.err.println("kstreams-peer: --no-repartition drops records whose JSON key"
                                    + " is not their Kafka key (first: JSON " + v.key + ", Kafka " + k + ")");
                        }
                        return false;
                    }, Named.as("json-key-is-kafka-key"))
                    .mapValues(v -> v.value, Named.as("value"))
                    .groupByKey(Grouped.with(Serdes.String(), Serdes.Double()));
        }
        grouped
                .windowedBy(TimeWindows.ofSizeAndGrace(WINDOW, Duration.ofMillis(a.graceMs)))
                .aggregate(
                        () -> Agg.EMPTY,
                        (key, x, agg) -> agg.add(x),
                        Named.as("aggregate"),
                        Materialized.<String, Agg, WindowStore<Bytes, byte[]>>as("window-aggregates")
                                .withKeySerde(Serdes.String())
                                .withValueSerde(aggSerde()))
                .suppress(Suppressed.untilWindowCloses(Suppressed.BufferConfig.unbounded())
                        .withName("until-window-closes"))
                .toStream(Named.as("closed-windows"))
                .map((w, agg) -> KeyValue.pair(windowKey(w), windowJson(w, agg)), Named.as("to-json"))
                .to(a.output, Produced.with(Serdes.String(), Serdes.String()).withName("output"));
        return builder.build(props);
    }

    static Properties config(Args a, Path stateDir) {
        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, a.appId);
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, a.brokers);
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.AT_LEAST_ONCE);
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, a.threads);
        p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, 100);
        p.put(StreamsConfig.REPLICATION_FACTOR_CONFIG, 1);
        p.put(StreamsConfig.STATE_DIR_CONFIG, stateDir.toString());
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG), "earliest");
        return p;
    }

    public static void main(String[] argv) throws Exception {
        Args a = Args.parse(argv);
        if (a == null) {
            System.exit(2);
        }
        requireTopics(a);
        Path stateDir = Files.createTempDirectory(tempRoot(), "kstreams-peer-");
        AtomicLong seen = new AtomicLong();
        AtomicLong firstMs = new AtomicLong();
        Properties props = config(a, stateDir);
        KafkaStreams streams = new KafkaStreams(topology(a, props, seen, firstMs), props);

        AtomicBoolean running = new AtomicBoolean();
        CountDownLatch failed = new CountDownLatch(1);
        streams.setStateListener((now, before) -> {
            if (now == KafkaStreams.State.RUNNING && running.compareAndSet(false, true)) {
                emit("{\"event\":\"running\",\"t_ms\":" + System.currentTimeMillis() + "}");
            } else if (now == KafkaStreams.State.ERROR) {
                failed.countDown();
            }
        });
        streams.setUncaughtExceptionHandler(e -> {
            System.err.println("kstreams-peer: stream thread failed: " + e);
            e.printStackTrace(System.err);
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });

        // SIGTERM: close cleanly (commit, flush the producer), leave the group, remove the
        // state directory, and exit 0 rather than the JVM's 143 for a signal. Kafka Streams
        // stays in the group on close by default, and a restart of the same application id
        // would then wait out the old members' session timeout (45 s) before it gets partitions.
        int[] exitCode = {0};
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            long dropped = droppedRecords(streams); // the task metrics go with close()
            streams.close(CloseOptions.timeout(Duration.ofSeconds(30))
                    .withGroupMembershipOperation(CloseOptions.GroupMembershipOperation.LEAVE_GROUP));
            deleteTree(stateDir);
            emit("{\"event\":\"stopped\",\"t_ms\":" + System.currentTimeMillis()
                    + ",\"dropped_records\":" + dropped + ",\"key_mismatches\":" + keyMismatches.get() + "}");
            System.err.flush();
            Runtime.getRuntime().halt(exitCode[0]);
        }, "kstreams-peer-shutdown"));

        streams.start();
        failed.await();
        // The client shut itself down after a fatal error: exit 1 (the hook still cleans up).
        exitCode[0] = 1;
        System.exit(1);
    }

    /**
     * Fails fast (exit 2) when the input or output topic is missing: Kafka Streams itself would
     * retry a missing output topic forever, re-initialising its tasks every 60 s.
     */
    static void requireTopics(Args a) throws InterruptedException {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, a.brokers);
        try (Admin admin = Admin.create(p)) {
            admin.describeTopics(List.of(a.input, a.output)).allTopicNames().get(60, TimeUnit.SECONDS);
        } catch (ExecutionException | TimeoutException e) {
            Throwable cause = e instanceof ExecutionException && e.getCause() != null ? e.getCause() : e;
            System.err.println("kstreams-peer: cannot use topics " + a.input + " and " + a.output
                    + " on " + a.brokers + ": " + cause);
            System.exit(2);
        }
    }

    /**
     * Records the application dropped: malformed ones are filtered before this count, so these
     * are the late ones (for a window already past end + grace) plus any skipped by the
     * runtime. Summed over the task-level {@code dropped-records-total} metrics.
     */
    static long droppedRecords(KafkaStreams streams) {
        double total = 0;
        for (var m : streams.metrics().entrySet()) {
            if (m.getKey().name().equals("dropped-records-total")
                    && m.getValue().metricValue() instanceof Double d) {
                total += d;
            }
        }
        return (long) total;
    }

    /** $TMPDIR when set (the benchmark points it into its run directory), else java.io.tmpdir. */
    static Path tempRoot() {
        String env = System.getenv("TMPDIR");
        if (env != null && !env.isEmpty() && Files.isDirectory(Path.of(env))) {
            return Path.of(env);
        }
        return Path.of(System.getProperty("java.io.tmpdir"));
    }

    static void deleteTree(Path root) {
        try (Stream<Path> paths = Files.walk(root)) {
            paths.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
        } catch (IOException e) {
            System.err.println("kstreams-peer: cannot remove " + root + ": " + e);
        }
    }
}
